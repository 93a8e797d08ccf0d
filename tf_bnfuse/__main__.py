from tf_bnfuse import cli

cli.run()
