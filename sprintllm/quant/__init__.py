"""Weight quantization: block formats, quantization methods for layers, offline quantizers."""
