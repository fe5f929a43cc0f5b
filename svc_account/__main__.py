from svc_account.server import main

main()
