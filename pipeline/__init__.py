"""maepipe: MAE pretraining grid -> selection -> linear probe / fine-tune -> ROC-AUC evaluation."""
