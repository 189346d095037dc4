"""iwp's tools: the command line and the commands built on the stages (export, runtime, calibration) and the
core (iwp). Imports run one way: tools -> stages -> core; nothing below imports from here."""
