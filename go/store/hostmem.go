package store

import (
	"fmt"
	"math"
	"syscall"

	"github.com/moe-infinity/moe_infinity/go/dtype"
)

// HostTensor is a tensor for ReplaceHost: its bytes are a view of memory
// from AllocHost.
type HostTensor struct {
	// Name is the tensor name.
	Name string
	// DType is the element type.
	DType dtype.DType
	// Shape holds the dimensions in elements.
	Shape []int64
	// Data holds the tensor's bytes (little-endian, row-major).
	Data []byte
}

// AllocHost returns n bytes of zeroed, page-aligned anonymous memory, out
// of the Go heap (a GPU backend can pin it in place; Close returns it to
// the system at once), for tensors given to ReplaceHost. Memory not given
// to ReplaceHost is returned with FreeHost.
func AllocHost(n int64) ([]byte, error) {
	if n <= 0 || uint64(n) > math.MaxInt {
		return nil, fmt.Errorf("store: cannot allocate %d bytes of host memory", n)
	}
	b, err := syscall.Mmap(-1, 0, int(n), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return nil, fmt.Errorf("store: allocating %d bytes of host memory: %w", n, err)
	}
	return b, nil
}

// FreeHost returns memory from AllocHost that no checkpoint owns.
func FreeHost(mem []byte) error {
	if err := syscall.Munmap(mem); err != nil {
		return fmt.Errorf("store: freeing %d bytes of host memory: %w", len(mem), err)
	}
	return nil
}

// ReplaceHost removes the host tensors named in remove (registered with
// AddHost: their memory is the caller's again as soon as this returns) and
// registers add, whose bytes are views of mem, memory from AllocHost that
// the checkpoint owns from then on and unmaps at Close. Either all of it
// happens or none (mem is then still the caller's). Errors: a name in
// remove that is not a host tensor (ErrNotFound), a name in add that is
// registered and not removed, or given twice (ErrDuplicate), a tensor
// whose bytes are not its shape's or lie outside mem, ErrClosed.
func (c *Checkpoint) ReplaceHost(remove []string, add []HostTensor, mem []byte) error {
	lo, hi := addrOf(mem), addrOf(mem)+uintptr(len(mem))
	for _, t := range add {
		if err := checkHost(t.Name, t.DType, t.Shape, t.Data); err != nil {
			return err
		}
		if len(t.Data) > 0 && (addrOf(t.Data) < lo || addrOf(t.Data)+uintptr(len(t.Data)) > hi) {
			return &FormatError{File: HostSource, Tensor: t.Name, Msg: "data lies outside the memory given to ReplaceHost"}
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	gone := make(map[string]bool, len(remove))
	for _, n := range remove {
		t, ok := c.tensors[n]
		if !ok || t.Source != HostSource {
			return &FormatError{File: HostSource, Tensor: n, err: ErrNotFound, Msg: "no host tensor of that name to replace"}
		}
		gone[n] = true
	}
	added := make(map[string]bool, len(add))
	for _, t := range add {
		if _, ok := c.tensors[t.Name]; (ok && !gone[t.Name]) || added[t.Name] {
			return &FormatError{File: HostSource, Tensor: t.Name, err: ErrDuplicate, Msg: "duplicate tensor"}
		}
		added[t.Name] = true
	}
	for n := range gone {
		delete(c.tensors, n)
	}
	for _, t := range add {
		c.tensors[t.Name] = &Tensor{Name: t.Name, DType: t.DType, Shape: append([]int64{}, t.Shape...), Source: HostSource,
			data: t.Data[:len(t.Data):len(t.Data)]}
	}
	c.owned = append(c.owned, mem)
	return nil
}
