//go:build !cuda

package main

// buildVariant names this build of the library.
const buildVariant = "cpu"
