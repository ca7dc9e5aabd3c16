//go:build cuda

package cuda

import (
	"fmt"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// fp8MaxHidden is the largest hidden size moe_gate_up_swiglu_fp8 takes: it
// stages x in shared memory (MOE_MAX_SMEM_FLOATS in cuda/moe_ffn.cu).
const fp8MaxHidden = 12288

// launchFFN launches l's two kernels (gate_up, then down) on stream s,
// each with its parameter struct.
func launchFFN[G, D kernelParams](b *Backend, l ffnLaunches[G, D], s uintptr) error {
	if err := launchParams(b.ffnFns[l.kernels[0]], l.grids[0][0], l.grids[0][1], 32*warpsPerBlock, s, &l.gateUp); err != nil {
		return fmt.Errorf("launching %s: %w", l.kernels[0], err)
	}
	if err := launchParams(b.ffnFns[l.kernels[1]], l.grids[1][0], l.grids[1][1], 32*warpsPerBlock, s, &l.down); err != nil {
		return fmt.Errorf("launching %s: %w", l.kernels[1], err)
	}
	return nil
}

// checkFP8 refuses FP8 calls the kernels cannot take, and gpt-oss MXFP4
// ones (whose gate_up kernel stages x in shared memory as well).
func checkFP8(a backend.FFNArgs) error {
	if a.FP8 != nil && a.Hidden > fp8MaxHidden {
		return fmt.Errorf("backend cuda: the FP8 expert kernels take hidden sizes up to %d, not %d", fp8MaxHidden, a.Hidden)
	}
	if q := a.GptOss; q != nil && q.MXFP4 && a.Hidden > fp8MaxHidden {
		return fmt.Errorf("backend cuda: the gpt-oss MXFP4 expert kernels take hidden sizes up to %d, not %d", fp8MaxHidden, a.Hidden)
	}
	return nil
}

// launchTables launches the kernels a's experts need (swigluLaunches, or
// gptOssLaunches for a.GptOss) on a.Stream over the tables at tab (n
// experts), with the hand-off's skip list skip (0: none).
func (b *Backend) launchTables(a backend.FFNArgs, tab uint64, n int, skip uint64) error {
	if a.GptOss != nil {
		if skip != 0 {
			return fmt.Errorf("backend cuda: the gpt-oss kernels take no hand-off skip list")
		}
		l, err := gptOssLaunches(a, tab, n)
		if err != nil {
			return err
		}
		return launchFFN(b, l, a.Stream)
	}
	l, err := swigluLaunches(a, tab, n, skip)
	if err != nil {
		return err
	}
	return launchFFN(b, l, a.Stream)
}

// FFN launches moe_gate_up_swiglu and moe_down (or the gpt-oss kernels,
// for a.GptOss) on a.Stream over the experts in a's tables (slot
// addresses).
func (b *Backend) FFN(a backend.FFNArgs) error {
	if err := a.Validate(); err != nil {
		return fmt.Errorf("backend cuda: %w", err)
	}
	if err := checkFP8(a); err != nil {
		return err
	}
	n := len(a.GateUp)
	if n > b.tableN {
		return fmt.Errorf("backend cuda: FFN over %d experts but tables hold %d", n, b.tableN)
	}
	slot := int(b.tableI.Add(1) % tableRing)
	table, ev := b.tables[slot], b.tableEv[slot]
	host := unsafe.Add(b.tableH, slot*tableBytes*b.tableN)
	entries := 3
	if a.FP8 != nil {
		entries = backend.MaxEntries
	}
	if a.GptOss != nil {
		entries = ossEntries
	}
	return b.dev.do(func() error {
		// The staging entry and the device table may still be in use by the
		// launch tableRing calls ago: on the host that is over long before
		// (the wait returns at once), on the device the new copy waits for it.
		if err := eventSync(ev); err != nil {
			return err
		}
		tab := unsafe.Slice((*uint64)(host), entries*n)
		if a.GptOss != nil {
			gptOssTable(tab, a, n)
		} else {
			swigluTable(tab, a, n)
		}
		if err := streamWait(a.Stream, ev); err != nil {
			return err
		}
		// From pinned memory, so the copy is asynchronous: the host does not
		// wait for the expert copies this stream is ordered after.
		if err := copyHtoD(table, host, int64(8*entries*n), a.Stream); err != nil {
			return err
		}
		if err := b.launchTables(a, table, n, 0); err != nil {
			return err
		}
		return eventRecord(ev, a.Stream)
	})
}

// swigluTable writes a's SwiGLU tables into tab (gate, up and down rows,
// then FP8 scale grids; entry j of expert e at tab[j·n+e]).
func swigluTable(tab []uint64, a backend.FFNArgs, n int) {
	copy(tab[:n], a.GateUp)
	for e := range n {
		tab[n+e] = a.UpAddr(int64(e))
	}
	copy(tab[2*n:3*n], a.Down)
	if q := a.FP8; q != nil {
		copy(tab[3*n:4*n], q.GateScale)
		copy(tab[4*n:5*n], q.UpScale)
		copy(tab[5*n:], q.DownScale)
	}
}
