"""CXR-LLaVA v2 from stock transformers parts: config, weights, prompt, generation.

Never runs the authors' custom code (`trust_remote_code`) and never unpickles `.bin` files.
Weights: CC BY-NC 4.0 plus the Llama 2 licence; research use only, not for clinical decisions.
"""
