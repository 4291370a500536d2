"""The flexmoe-mt commands, one module each with main(argv): train, eval, translate, extract, throughput."""
