"""How one tensor becomes low-bit: math on tensors and numbers (grids, granularity, ranges, observers,
AdaRound, outliers), the weight and activation quantizers, the quantized tensor and the TimeTable.
Nothing here reads a config object."""
