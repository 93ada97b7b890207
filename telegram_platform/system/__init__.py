"""Operating-system primitives any package may use (durable file replacement, process identity): a
leaf, importing nothing else of the platform."""
