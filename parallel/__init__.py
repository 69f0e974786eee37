"""Topology, partition plans and the engines that execute them (pure types + torch.distributed)."""
