package trace

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// saveHelperEnv, when set in the environment, turns
// TestSaveFile_ConcurrentProcessesLoseNothing into one of the child
// processes it starts (the os.Args[0] re-exec pattern); its value is
// "path barrier-dir who each capacity".
const saveHelperEnv = "MOE_TRACE_SAVE_HELPER"

func TestSaveFile_ConcurrentProcessesLoseNothing(t *testing.T) {
	if args := os.Getenv(saveHelperEnv); args != "" {
		saveHelper(t, args)
		return
	}
	if !lockSupported {
		t.Skip("no flock(2) on this platform: concurrent savers may lose EAMs (documented at SaveFile)")
	}
	const (
		children = 4
		each     = 3  // EAMs per child
		rounds   = 30 // total EAMs: rounds*children*each = 360 <= capacity
		capacity = 512
	)
	dir := t.TempDir()
	path := filepath.Join(dir, "eamc.trace")
	barriers := t.TempDir()

	// A reader that loads the file whenever it exists, all through the
	// saves: it must always find a complete, valid trace file.
	stop := make(chan struct{})
	var readerWG sync.WaitGroup
	var reads int
	var readErr error
	readerWG.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			_, err := LoadFile(path)
			switch {
			case err == nil:
				reads++
			case !errors.Is(err, fs.ErrNotExist):
				readErr = err
				return
			}
			time.Sleep(50 * time.Microsecond) // leave the CPU to the savers
		}
	})
	stopReader := sync.OnceFunc(func() { close(stop); readerWG.Wait() })
	t.Cleanup(stopReader)

	for r := range rounds {
		barrier := filepath.Join(barriers, fmt.Sprintf("round-%d", r))
		cmds := make([]*exec.Cmd, children)
		outs := make([]*bytes.Buffer, children)
		for i := range children {
			who := r*children + i
			cmd := exec.Command(os.Args[0], "-test.run=^TestSaveFile_ConcurrentProcessesLoseNothing$")
			cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %s %d %d %d", saveHelperEnv, path, barrier, who, each, capacity),
				// Under -race a process sleeps 1 s at exit by default.
				"GORACE="+os.Getenv("GORACE")+" atexit_sleep_ms=0")
			outs[i] = &bytes.Buffer{}
			cmd.Stdout, cmd.Stderr = outs[i], outs[i]
			require.NoError(t, cmd.Start())
			cmds[i] = cmd
		}
		// Every child has loaded the file and recorded its EAMs when its
		// ready file appears; then all are released at once to save.
		deadline := time.Now().Add(60 * time.Second)
		for i := range children {
			ready := fmt.Sprintf("%s.ready-%d", barrier, r*children+i)
			for !exists(ready) {
				require.True(t, time.Now().Before(deadline), "child %d never got ready:\n%s", i, outs[i])
				time.Sleep(time.Millisecond)
			}
		}
		require.NoError(t, os.WriteFile(barrier, nil, 0o644))
		for i, cmd := range cmds {
			require.NoError(t, cmd.Wait(), "child %d of round %d:\n%s", i, r, outs[i])
		}

		got, err := LoadFile(path)
		require.NoError(t, err, "round %d", r)
		assertHolds(t, got, (r+1)*children, each)
		assert.Equal(t, []string{"eamc.trace", "eamc.trace.lock"}, dirEntries(t, dir), "no temp files left")
		if t.Failed() {
			t.Fatalf("round %d lost EAMs", r)
		}
	}
	stopReader()
	require.NoError(t, readErr, "a reader saw a broken trace file during the saves")
	t.Logf("%d rounds of %d processes; the reader loaded the file %d times during the saves", rounds, children, reads)
}

// saveHelper is the child process: it loads the trace file as the engine
// does, adds its own distinctEAMs, signals ready, waits for the barrier
// file and saves.
func saveHelper(t *testing.T, args string) {
	var path, barrier string
	var who, each, capacity int
	_, err := fmt.Sscan(args, &path, &barrier, &who, &each, &capacity)
	require.NoError(t, err, "bad %s=%q", saveHelperEnv, args)
	c := loadLikeEngine(t, path, 2, 4, capacity)
	for j := range each {
		require.NoError(t, c.Add(distinctEAM(who, j)))
	}
	require.NoError(t, os.WriteFile(barrier+".ready-"+strconv.Itoa(who), nil, 0o644))
	deadline := time.Now().Add(60 * time.Second)
	for !exists(barrier) {
		require.True(t, time.Now().Before(deadline), "the barrier %s never appeared", barrier)
		time.Sleep(200 * time.Microsecond)
	}
	require.NoError(t, c.SaveFile(path))
}

// exists reports whether a file exists at path.
func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
