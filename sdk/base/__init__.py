"""The base layer every other layer may import: the error tree, safe file I/O and the bundle format.

It depends on the standard library and numpy only, so the runtime, the kernels, the SDK facade and the
export layer all share one definition of what a bundle is and how it is read and written.
"""
