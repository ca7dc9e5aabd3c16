package main

import (
	"fmt"
	"sync"

	"github.com/moe-infinity/moe_infinity/go/engine"
)

// handles maps opaque integer handles to engines. Handles are never
// reused within a process, so a stale handle can never reach a new engine.
var handles = struct {
	sync.RWMutex
	next uint64
	m    map[uint64]*engine.Engine
}{m: map[uint64]*engine.Engine{}}

func register(e *engine.Engine) uint64 {
	handles.Lock()
	defer handles.Unlock()
	handles.next++
	handles.m[handles.next] = e
	return handles.next
}

func lookup(h uint64) (*engine.Engine, error) {
	handles.RLock()
	defer handles.RUnlock()
	e, ok := handles.m[h]
	if !ok {
		return nil, fmt.Errorf("%w %d (closed or never created)", engine.ErrHandle, h)
	}
	return e, nil
}

func unregister(h uint64) (*engine.Engine, error) {
	handles.Lock()
	defer handles.Unlock()
	e, ok := handles.m[h]
	if !ok {
		return nil, fmt.Errorf("%w %d (closed or never created)", engine.ErrHandle, h)
	}
	delete(handles.m, h)
	return e, nil
}

// liveEngines returns the number of open engines (for tests).
func liveEngines() int {
	handles.RLock()
	defer handles.RUnlock()
	return len(handles.m)
}
