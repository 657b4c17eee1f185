from cer.cli import main

main()
