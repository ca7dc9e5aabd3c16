//go:build cuda

package cuda

import (
	"strings"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

var nvmlOnce struct {
	sync.Once
	ok bool
}

// nvmlMemory returns the total and free memory NVML reports for the GPU
// with the given PCI bus id ("0000:01:00.0"); ok is false when NVML is not
// available (no libnvidia-ml) or does not know the device.
func nvmlMemory(busID string) (total, free int64, ok bool) {
	nvmlOnce.Do(func() { nvmlOnce.ok = nvml.Init() == nvml.SUCCESS })
	if !nvmlOnce.ok || busID == "" {
		return 0, 0, false
	}
	dev, ret := nvml.DeviceGetHandleByPciBusId(strings.ToLower(busID))
	if ret != nvml.SUCCESS {
		dev, ret = nvml.DeviceGetHandleByPciBusId(busID)
	}
	if ret != nvml.SUCCESS {
		return 0, 0, false
	}
	mem, ret := dev.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return 0, 0, false
	}
	return int64(mem.Total), int64(mem.Free), true
}
