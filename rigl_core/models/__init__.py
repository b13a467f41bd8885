"""Models by name: built-in nets, torchvision, timm and Hugging Face configs (registry.py), and
declarative JSON architectures (architecture.py: the specs; build.py: the torch modules)."""
