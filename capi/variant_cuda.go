//go:build cuda

package main

import "github.com/moe-infinity/moe_infinity/go/backend/cuda"

// buildVariant names this build of the library.
const buildVariant = "cuda"

// deviceMemory returns a GPU's total and free memory in bytes (NVML's
// numbers where available).
func deviceMemory(device int) (int64, int64, error) { return cuda.DeviceMemory(device) }
