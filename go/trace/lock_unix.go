//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package trace

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// lockSupported reports whether lockFile really excludes other processes
// on this platform.
const lockSupported = true

// lockFile takes an exclusive advisory lock (flock(2)) on the lock file at
// path, creating it (mode 0644) if needed, and blocks until the lock is
// granted. The returned function releases it. The lock belongs to the open
// file description, so it also excludes other goroutines of this process
// that lock the same path, and the kernel releases it if the process dies.
// The lock file is never removed: removing it while another process waits
// on it would let a third process lock a new file at the same path.
func lockFile(path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		_ = f.Close()
	}, nil
}

// isNoSpace reports whether err means the filesystem is full: no space left
// on the device (ENOSPC) or the user's disk quota is exhausted (EDQUOT).
func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}
