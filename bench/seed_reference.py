"The seed's way of serving, for `make bench` only: StandardScaler + RandomForest(100, n_jobs=-1), sync endpoints, pydantic bodies."
import os
from typing import List

import joblib
import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI(title='seed reference')
model = joblib.load(os.environ['BENCH_REFERENCE_MODEL'])  # as the seed did: load at import
THRESHOLD = 0.5


class Transaction(BaseModel):
    features: List[float]


class Batch(BaseModel):
    instances: List[List[float]]


@app.post('/predict')
def predict(req: Transaction):  # sync: FastAPI runs it in its thread pool
    p = float(model.predict_proba(np.array([req.features]))[0, 1])
    return {'prediction': 'fraud' if p >= THRESHOLD else 'legit', 'fraud_probability': p, 'model_version': 'seed'}


@app.post('/predict/batch')
def predict_batch(req: Batch):
    p = model.predict_proba(np.array(req.instances))[:, 1]
    return {'model_version': 'seed', 'predictions': [{'prediction': 'fraud' if q >= THRESHOLD else 'legit', 'fraud_probability': float(q)}
                                                     for q in p]}
