from codefleet.gateway.server import main

raise SystemExit(main())
