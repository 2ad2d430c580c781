from pairmill.cli import main

main()
