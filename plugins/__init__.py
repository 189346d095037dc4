"""iwp.plugins: one folder per op. visual_token_select/ holds the selection methods' PyTorch reference."""
