from svc_transfer.server import main

main()
