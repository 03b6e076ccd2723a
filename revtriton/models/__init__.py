"""Reference models: RevNets, their ResNet twins and a reversible transformer."""
