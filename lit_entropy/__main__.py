from lit_entropy.cli import main

main()
