from codefleet.gateway.process import main

raise SystemExit(main())
