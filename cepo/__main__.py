from cepo.cli import main

main()
