from svc_notify.server import main

main()
