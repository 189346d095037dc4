"""iwp.runtime: the engine runtime (issue: runtime). Until it lands, iwp.model runs the pruned model in PyTorch."""
