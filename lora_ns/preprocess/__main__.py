from lora_ns.preprocess.cli import main

raise SystemExit(main())
