//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package trace

import (
	"errors"
	"syscall"
)

// lockSupported reports whether lockFile really excludes other processes
// on this platform.
const lockSupported = false

// lockFile does nothing on this platform (no flock(2)): concurrent saves to
// one trace file from several processes never corrupt it (the rename is
// atomic) but may lose the EAMs of all but the last writer.
func lockFile(string) (unlock func(), err error) {
	return func() {}, nil
}

// isNoSpace reports whether err means the filesystem is full.
func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC)
}
