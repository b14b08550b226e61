from gqaprune.cli import main

main()
