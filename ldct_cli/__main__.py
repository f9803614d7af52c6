from ldct_cli.cli import main

main()
