"""What a trained model is written as: dense and packed safetensors (packed.py), the entropy-coded
compressed format (compressed.py), ONNX (onnx.py) and 2:4 GPU weights (nm.py)."""
