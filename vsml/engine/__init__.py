"""The VSML engine: config, θ layout, state, the sub-LSTM cell, the batched network, conv layers."""
