from qatconv.cli import main

main()
