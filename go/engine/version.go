package engine

// Version is the engine's version.
const Version = "0.1.0"
