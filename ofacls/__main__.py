from ofacls.cli import main

main()
