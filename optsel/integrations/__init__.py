"""optsel inside other training stacks: ``optsel.integrations.hf`` (a Hugging Face ``Trainer`` / TRL
``SFTTrainer`` that selects each step's samples with optsel's selectors). Import the submodule you need;
this package imports nothing heavy."""
