from iwp.tools.cli import main

main()
