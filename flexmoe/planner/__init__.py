"""Cost model of the MoE layer at scale."""
