"""Models by name: built-in nets, torchvision, timm and Hugging Face configs (registry.py),
declarative JSON architectures (architecture.py: the specs; build.py: the torch modules) and
`torch.export` programs loaded without running code from the file (program/)."""
