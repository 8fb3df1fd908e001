"""How one tensor becomes low-bit: pure math and small quantizer modules."""
