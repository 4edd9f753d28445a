"""What an operator types: the command line (`cli`), check-config's endpoint check (`reach`), `provision`,
`replay`, and the spool's `status` and `spool-import` (`spool_admin`)."""
