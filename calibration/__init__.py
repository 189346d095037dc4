"""iwp.calibration: calibration hooks that choose method defaults from data (stage layers, λ, ...)."""
