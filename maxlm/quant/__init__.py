"""Weight types that stand in for a float matmul weight, below both the model and serving.

`maxlm.models.layers.dense` multiplies by a plain float array itself and hands any `MatmulWeight` its own product;
serving (`maxlm.serve.quantize`) and offline quantizers produce them. Modules: `weights` (the protocol and
`QuantizedWeight`: int8 per output channel, int4 group-wise) and `int4` (nibble packing, group sizes).
"""
