//go:build cuda

package cuda

import (
	"fmt"
	"unsafe"

	"gorgonia.org/cu"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

// fp8MaxHidden is the largest hidden size moe_gate_up_swiglu_fp8 takes: it
// stages x in shared memory (MOE_MAX_SMEM_FLOATS in cuda/moe_ffn.cu).
const fp8MaxHidden = 12288

// launchFFNSkip launches moe_gate_up_swiglu and moe_down (their _fp8
// variants for FP8 experts, with the scale grids' tables) on a.Stream with
// the pointer tables at tab: entry j (backend.EntryGate, ...) of expert e
// at tab + 8·(j·n + e), n experts (3 entries each, 6 for FP8 experts).
// Null entries skip their pairs; a.Addend (0: none) joins moe_down's sums.
// skip is a copy-mode hand-off's device skip list (0: none; bfloat16/
// float16 experts only): pairs of the experts it lists are skipped, and
// a.Addend is added only when it says so.
func (b *Backend) launchFFNSkip(a backend.FFNArgs, tab uint64, n int, skip uint64) error {
	code, wcode, err := kernelDTypes(a)
	if err != nil {
		return err
	}
	P := a.T * a.K
	E := uint64(n)
	at := func(j int) uint64 { return tab + uint64(8*j*n) }
	gt, ut, dt := at(backend.EntryGate), at(backend.EntryUp), at(backend.EntryDown)
	grid := int((a.Inter + warpsPerBlock - 1) / warpsPerBlock)
	if q := a.FP8; q != nil {
		if err := launch(b.gateUp8, grid, int(P), 32*warpsPerBlock, a.Stream,
			a.X, a.TopK, gt, ut, a.Scratch, uint64(P), uint64(a.K), uint64(a.Hidden), uint64(a.Inter), uint64(code), E,
			uint64(q.BlockRows), uint64(q.BlockCols), at(backend.EntryGateScale), at(backend.EntryUpScale), uint64(q.UpRow0)); err != nil {
			return fmt.Errorf("launching moe_gate_up_swiglu_fp8: %w", err)
		}
		grid = int((a.Hidden + warpsPerBlock - 1) / warpsPerBlock)
		if err := launch(b.down8, grid, int(a.T), 32*warpsPerBlock, a.Stream,
			a.Scratch, a.TopK, dt, a.Weights, a.Out, uint64(a.T), uint64(a.K), uint64(a.Hidden), uint64(a.Inter), uint64(code), E,
			uint64(wcode), uint64(q.BlockRows), uint64(q.BlockCols), at(backend.EntryDownScale), a.Addend); err != nil {
			return fmt.Errorf("launching moe_down_fp8: %w", err)
		}
		return nil
	}
	if err := launch(b.gateUp, grid, int(P), 32*warpsPerBlock, a.Stream,
		a.X, a.TopK, gt, ut, a.Scratch, uint64(P), uint64(a.K), uint64(a.Hidden), uint64(a.Inter), uint64(code), E, skip); err != nil {
		return fmt.Errorf("launching moe_gate_up_swiglu: %w", err)
	}
	grid = int((a.Hidden + warpsPerBlock - 1) / warpsPerBlock)
	if err := launch(b.down, grid, int(a.T), 32*warpsPerBlock, a.Stream,
		a.Scratch, a.TopK, dt, a.Weights, a.Out, uint64(a.T), uint64(a.K), uint64(a.Hidden), uint64(a.Inter), uint64(code), E,
		uint64(wcode), a.Addend, skip); err != nil {
		return fmt.Errorf("launching moe_down: %w", err)
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

// launchTables launches the kernels a's experts need (launchFFNSkip, or
// launchGptOss for a.GptOss) over the tables at tab (n experts).
func (b *Backend) launchTables(a backend.FFNArgs, tab uint64, n int, skip uint64) error {
	if a.GptOss != nil {
		if skip != 0 {
			return fmt.Errorf("backend cuda: the gpt-oss kernels take no hand-off skip list")
		}
		return b.launchGptOss(a, tab, n)
	}
	return b.launchFFNSkip(a, tab, n, skip)
}

// launchGptOss launches the gpt-oss kernels (gptOssLaunches) on
// a.Stream with the tables at tab (gptOssTable's layout, n experts).
func (b *Backend) launchGptOss(a backend.FFNArgs, tab uint64, n int) error {
	fns := map[string]cu.Function{
		"moe_gate_up_gptoss": b.gateUpOss, "moe_down_gptoss": b.downOss,
		"moe_gate_up_gptoss_mxfp4": b.gateUpOss4, "moe_down_gptoss_mxfp4": b.downOss4,
	}
	ls, err := gptOssLaunches(a, tab, n)
	if err != nil {
		return err
	}
	for _, l := range ls {
		if err := launch(fns[l.kernel], l.grid[0], l.grid[1], 32*warpsPerBlock, a.Stream, l.args...); err != nil {
			return fmt.Errorf("launching %s: %w", l.kernel, err)
		}
	}
	return nil
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
