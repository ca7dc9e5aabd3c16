//go:build cuda

package cuda

import (
	"fmt"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

const warpsPerBlock = 8

// launchFFN launches moe_gate_up_swiglu and moe_down on a.Stream with the
// gate, up and down pointer tables at tab (3 × n entries, n experts).
func (b *Backend) launchFFN(a backend.FFNArgs, tab uint64, n int) error {
	P := a.T * a.K
	E := uint64(n)
	gt, ut, dt := tab, tab+uint64(8*n), tab+uint64(16*n)
	grid := int((a.Inter + warpsPerBlock - 1) / warpsPerBlock)
	if err := launch(b.gateUp, grid, int(P), 32*warpsPerBlock, a.Stream,
		a.X, a.TopK, gt, ut, a.Scratch, uint64(P), uint64(a.K), uint64(a.Hidden), uint64(a.Inter), uint64(a.DType), E); err != nil {
		return fmt.Errorf("launching moe_gate_up_swiglu: %w", err)
	}
	grid = int((a.Hidden + warpsPerBlock - 1) / warpsPerBlock)
	if err := launch(b.down, grid, int(a.T), 32*warpsPerBlock, a.Stream,
		a.Scratch, a.TopK, dt, a.Weights, a.Out, uint64(a.T), uint64(a.K), uint64(a.Hidden), uint64(a.Inter), uint64(a.DType), E,
		a.KernelWDType()); err != nil {
		return fmt.Errorf("launching moe_down: %w", err)
	}
	return nil
}

// FFN launches moe_gate_up_swiglu and moe_down on a.Stream over the
// experts in a's tables (slot addresses).
func (b *Backend) FFN(a backend.FFNArgs) error {
	if err := a.Validate(); err != nil {
		return fmt.Errorf("backend cuda: %w", err)
	}
	n := len(a.GateUp)
	if n > b.tableN {
		return fmt.Errorf("backend cuda: FFN over %d experts but tables hold %d", n, b.tableN)
	}
	slot := int(b.tableI.Add(1) % tableRing)
	table, ev := b.tables[slot], b.tableEv[slot]
	host := unsafe.Add(b.tableH, slot*24*b.tableN)
	return b.dev.do(func() error {
		// The staging entry and the device table may still be in use by the
		// launch tableRing calls ago: on the host that is over long before
		// (the wait returns at once), on the device the new copy waits for it.
		if err := eventSync(ev); err != nil {
			return err
		}
		tab := unsafe.Slice((*uint64)(host), 3*n)
		copy(tab[:n], a.GateUp)
		for e := range n {
			tab[n+e] = a.UpAddr(int64(e))
		}
		copy(tab[2*n:], a.Down)
		if err := streamWait(a.Stream, ev); err != nil {
			return err
		}
		// From pinned memory, so the copy is asynchronous: the host does not
		// wait for the expert copies this stream is ordered after.
		if err := copyHtoD(table, host, int64(24*n), a.Stream); err != nil {
			return err
		}
		if err := b.launchFFN(a, table, n); err != nil {
			return err
		}
		return eventRecord(ev, a.Stream)
	})
}
