//go:build cgo

package cpuffn

/*
#include <stdlib.h>
#include <string.h>
#include "cpuffn.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"time"
)

// ReadBandwidth measures how fast threads threads (<= 0: runtime.NumCPU())
// read host memory with the best instruction set: each sums its share of
// a buffer of n bytes (allocated, and touched once, outside the timing),
// reps times; it returns the best pass in GB/s (1e9 bytes a second). It is
// the floor the expert FFN is compared with: a decode-time expert FFN
// reads every weight once and cannot beat it.
func ReadBandwidth(n int64, threads, reps int) (float64, error) {
	if n < 1<<20 || reps < 1 {
		return 0, fmt.Errorf("cpuffn: bandwidth probe needs at least 1 MiB and one pass (got %d bytes, %d passes)", n, reps)
	}
	if threads <= 0 {
		threads = runtime.NumCPU()
	}
	buf := C.malloc(C.size_t(n))
	if buf == nil {
		return 0, fmt.Errorf("cpuffn: bandwidth probe: cannot allocate %d bytes", n)
	}
	defer C.free(buf)
	C.memset(buf, 1, C.size_t(n))
	isa := C.int(Best())
	best := 0.0
	var sink float64
	for range reps {
		sums := make([]float64, threads)
		t0 := time.Now()
		var wg sync.WaitGroup
		for w := range threads {
			lo, hi := n*int64(w)/int64(threads)&^63, n*int64(w+1)/int64(threads)&^63
			if w == threads-1 {
				hi = n
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				sums[w] = float64(C.cpuffn_sum(addr(buf)+C.uint64_t(lo), C.int64_t(hi-lo), isa))
			}()
		}
		wg.Wait()
		gbps := float64(n) / time.Since(t0).Seconds() / 1e9
		best = max(best, gbps)
		for _, s := range sums {
			sink += s
		}
	}
	if sink == 0 {
		return 0, fmt.Errorf("cpuffn: bandwidth probe read nothing")
	}
	return best, nil
}
