from svc_customer.server import main

main()
