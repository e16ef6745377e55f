"""What the command line shows a user: errors (:mod:`.errors`) and live progress (:mod:`.progress`)."""
