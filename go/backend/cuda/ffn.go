//go:build cuda

package cuda

import (
	"fmt"
	"unsafe"

	"github.com/moe-infinity/moe_infinity/go/backend"
)

const warpsPerBlock = 8

// FFN launches moe_gate_up_swiglu and moe_down on a.Stream.
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
	host := unsafe.Add(b.tableH, slot*16*b.tableN)
	return b.dev.do(func() error {
		// The staging entry and the device table may still be in use by the
		// launch tableRing calls ago: on the host that is over long before
		// (the wait returns at once), on the device the new copy waits for it.
		if err := eventSync(ev); err != nil {
			return err
		}
		tab := unsafe.Slice((*uint64)(host), 2*n)
		copy(tab[:n], a.GateUp)
		copy(tab[n:], a.Down)
		if err := streamWait(a.Stream, ev); err != nil {
			return err
		}
		// From pinned memory, so the copy is asynchronous: the host does not
		// wait for the expert copies this stream is ordered after.
		if err := copyHtoD(table, host, int64(16*n), a.Stream); err != nil {
			return err
		}
		st := asStream(a.Stream)
		P := a.T * a.K
		gu, dn := table, table+uint64(8*n)
		args := []unsafe.Pointer{
			unsafe.Pointer(&a.X), unsafe.Pointer(&a.TopK), unsafe.Pointer(&gu), unsafe.Pointer(&a.Scratch),
			unsafe.Pointer(&P), unsafe.Pointer(&a.K), unsafe.Pointer(&a.Hidden), unsafe.Pointer(&a.Inter), unsafe.Pointer(&a.DType),
		}
		grid := int((a.Inter + warpsPerBlock - 1) / warpsPerBlock)
		if err := b.gateUp.Launch(grid, int(P), 1, 32*warpsPerBlock, 1, 1, 0, st, args); err != nil {
			return fmt.Errorf("launching moe_gate_up_swiglu: %w", err)
		}
		args = []unsafe.Pointer{
			unsafe.Pointer(&a.Scratch), unsafe.Pointer(&a.TopK), unsafe.Pointer(&dn), unsafe.Pointer(&a.Weights),
			unsafe.Pointer(&a.Out), unsafe.Pointer(&a.T), unsafe.Pointer(&a.K), unsafe.Pointer(&a.Hidden), unsafe.Pointer(&a.Inter),
			unsafe.Pointer(&a.DType),
		}
		grid = int((a.Hidden + warpsPerBlock - 1) / warpsPerBlock)
		if err := b.down.Launch(grid, int(a.T), 1, 32*warpsPerBlock, 1, 1, 0, st, args); err != nil {
			return fmt.Errorf("launching moe_down: %w", err)
		}
		return eventRecord(ev, a.Stream)
	})
}
