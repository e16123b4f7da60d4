"""Training: the loop, the jitted steps, losses, optimizer, FLOP counting, step hooks."""
